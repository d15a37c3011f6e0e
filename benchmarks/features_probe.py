"""Log-mel features of a batch, one clip at a time against one pass (``LogMelFrames.encode_batch(one_pass=...)``),
at the RTF benchmark's settings (16 kHz, 80 bands), median of ``--repeats`` after a warm-up.

    python benchmarks/features_probe.py --out benchmarks/results/features_probe_cpu.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
from pathlib import Path

import torch

from asr_rtf import timed  # this folder is on sys.path when a script here runs
from mmgen_audio import LogMelFrames


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--repeats", type=int, default=40)
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds of the two ways, each timed")
    a = p.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    m = LogMelFrames(16000, 80)
    rows = []
    g = torch.Generator().manual_seed(0)
    for seconds in (1.0, 10.0):
        for batch in (1, 8):
            # lengths 80-100 % of the clip, as a batch of real files would be
            waves = [(torch.randn(int(seconds * 16000 * (0.8 + 0.2 * i / max(batch - 1, 1))), generator=g) * 0.1)
                     .to(device) for i in range(batch)]
            row = {"seconds": seconds, "batch": batch, "per_clip_ms": [], "one_pass_ms": []}
            for _ in range(a.rounds):
                for way, one_pass in (("per_clip_ms", False), ("one_pass_ms", True)):
                    seconds_taken = timed(lambda: m.encode_batch(waves, one_pass=one_pass), a.repeats)
                    row[way].append(round(seconds_taken * 1e3, 3))
            medians = {way: statistics.median(row[way]) for way in ("one_pass_ms", "per_clip_ms")}
            row["one_pass_over_per_clip"] = medians["one_pass_ms"] / medians["per_clip_ms"]
            print(json.dumps(row), flush=True)
            rows.append(row)
    result = {"benchmark": "features_probe", "device": torch.cuda.get_device_name() if device == "cuda"
              else f"cpu ({torch.get_num_threads()} threads)", "host": platform.node(), "torch": torch.__version__,
              "repeats": a.repeats, "rows": rows}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
