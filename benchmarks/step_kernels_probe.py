"""Kernel choices of the decoding step (``TransformerStack.step``), on the GPU, timed inside CUDA graphs as the beam
search replays them: ``F.linear`` against ``addmm`` on a pre-transposed weight (``StepLinear``), and
``scaled_dot_product_attention`` against the plain formula for a few queries (``_few_query_attention``), at the
shapes of ``asr_rtf.py``'s model (d 144, 4 heads, FFN 576; 10 s clips: 251 encoder frames, 151 positions; beam 4).

    python benchmarks/step_kernels_probe.py --out benchmarks/results/step_kernels_probe_h100.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from mmgen.blocks.transformer import _few_query_attention


def graph_us(fn, calls: int = 20, replays: int = 200) -> float:
    """Microseconds per call of ``fn``, ``calls`` of them captured in one CUDA graph."""
    for _ in range(3):
        fn()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    for _ in range(10):
        graph.replay()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(replays):
        graph.replay()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / (replays * calls) * 1e6


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    a = p.parse_args()
    dev = "cuda"
    linear, attention = [], []
    with torch.inference_mode():
        for rows in (4, 32):
            for k_in, n_out in ((144, 432), (144, 144), (144, 576), (576, 144)):
                x, w, b = (torch.randn(rows, k_in, device=dev), torch.randn(n_out, k_in, device=dev),
                           torch.randn(n_out, device=dev))
                wt = w.t().contiguous()
                linear.append({"rows": rows, "in": k_in, "out": n_out,
                               "f_linear_us": graph_us(lambda: F.linear(x, w, b)),
                               "addmm_transposed_us": graph_us(lambda: torch.addmm(b, x, wt))})
                print(json.dumps(linear[-1]), flush=True)
            heads, e, group = 4, 36, 4
            utterances = rows // group
            q = torch.randn(rows, heads, 1, e, device=dev)
            kv = torch.randn(rows, heads, 151, e, device=dev)
            mask = (torch.arange(151, device=dev) <= 100)[None, :]
            qc = torch.randn(utterances, heads, group, e, device=dev)
            mem = torch.randn(utterances, heads, 251, e, device=dev)
            for name, args in (("self, 1 query over 151 positions, masked", (q, kv, kv, mask)),
                               (f"cross, {group} queries over 251 frames", (qc, mem, mem, None))):
                attention.append({"rows": rows, "attention": name,
                                  "sdpa_us": graph_us(lambda: F.scaled_dot_product_attention(
                                      args[0], args[1], args[2], attn_mask=args[3])),
                                  "plain_formula_us": graph_us(lambda: _few_query_attention(*args))})
                print(json.dumps(attention[-1]), flush=True)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps({"benchmark": "step_kernels_probe", "device": torch.cuda.get_device_name(),
                                       "torch": torch.__version__, "linear": linear, "attention": attention},
                                      indent=2))


if __name__ == "__main__":
    main()
