"""Where an attention beam-search step's time goes, on the GPU: eager steps, CUDA-graph replays (with a host sync
after every step, as the search checks whether it is done, and without), and the kernels of one eager step.

    python benchmarks/asr_step_profile.py --out benchmarks/results/asr_step_profile_h100.json

The model is ``asr_rtf.py``'s (Conformer-S-size encoder, 4-layer decoder, random weights), on random audio.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).parent))
from asr_rtf import ours  # noqa: E402


def per_step_ms(fn, steps: int) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps * 1e3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--compile", action="store_true", help="also time torch.compile'd steps replayed as a CUDA graph")
    p.add_argument("--fused", choices=("on", "off", "both"), default="both",
                   help="the decoder step as one Triton kernel (mmgen.kernels), as PyTorch operations, or both")
    a = p.parse_args()
    model = ours("cuda")
    model.hparams.max_target_length = 10 * a.steps
    rows, kernels = [], {}
    with torch.inference_mode():
        for seconds, batch in ((10.0, 1), (10.0, 8), (1.0, 8)):
            wave = torch.randn(batch, int(seconds * 16000), device="cuda") * 0.1
            feats = model.source.encode_batch(list(wave))
            memory, mask = model.net.encode(feats.values.cuda(), feats.mask.cuda())
            lp = model.net.ctc_head(memory).float().log_softmax(-1)
            for joint, fused in ((j, f) for j in (False, True) for f in {"on": (True,), "off": (False,),
                                                                           "both": (False, True)}[a.fused]):
                model.fused_decoding = fused
                row = {"seconds": seconds, "batch": batch, "decoding": "joint" if joint else "attention",
                       "fused": fused}
                def fresh(warm: int = 3):
                    s = model._beam_search(memory, mask, lp, model.hparams.beam_size, joint)
                    for _ in range(warm):
                        s.step(None)
                    return s

                n = min(a.steps, fresh(0).max_len - 4)  # steps past the decoder's positions would overflow it
                row["steps"] = n
                search = fresh()
                row["eager_ms"] = per_step_ms(lambda: search.step(None), n)
                timings = {}
                for name, sync in (("graph_sync_every_step_ms", True), ("graph_no_sync_ms", False)):
                    search = fresh()
                    graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graph):
                        search.step(None)
                    timings[name] = per_step_ms(lambda: (graph.replay(), sync and bool(search.done)), n)
                row.update(timings)
                if a.compile:
                    search = fresh(0)
                    step = torch.compile(search.step)
                    start = time.perf_counter()
                    for _ in range(3):
                        step(None)
                    torch.cuda.synchronize()
                    row["compile_s"] = time.perf_counter() - start
                    row["compiled_eager_ms"] = per_step_ms(lambda: step(None), 5)
                    graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graph):
                        step(None)
                    row["compiled_graph_ms"] = per_step_ms(graph.replay, n - 10)
                search = model._beam_search(memory, mask, lp, model.hparams.beam_size, joint)
                search.step(None)
                with profile(activities=[ProfilerActivity.CUDA]) as prof:
                    search.step(None)
                    torch.cuda.synchronize()
                events = [e for e in prof.key_averages() if e.device_time_total > 0]
                row["kernels_per_step"] = sum(e.count for e in events)
                row["gpu_busy_ms"] = sum(e.device_time_total for e in events) / 1e3
                kernels[f"{seconds}s_b{batch}_{row['decoding']}{'_fused' if fused else ''}"] = [
                    {"name": e.key[:90], "count": e.count, "us": round(e.device_time_total, 1)}
                    for e in sorted(events, key=lambda e: -e.device_time_total)[:25]]
                print(json.dumps(row), flush=True)
                rows.append(row)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps({"benchmark": "asr_step_profile", "device": torch.cuda.get_device_name(),
                                       "torch": torch.__version__, "rows": rows, "kernels": kernels}, indent=2))


if __name__ == "__main__":
    main()
