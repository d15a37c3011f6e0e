"""Train a language-model recipe for several seeds and report time to target val loss, best val loss and tokens/s.

    python benchmarks/lm_train.py --config recipes/text/shakespeare_char.yaml --seeds 1337 1338 1339 \
        --out benchmarks/results/shakespeare_char_h100.json

Each seed is its own process (``python -m mmgen fit``), so "time" is measured from that process's start, imports,
compilation and evaluations included, as nanoGPT's reference numbers are.

``--cold`` gives every seed's process fresh, empty compilation caches (``TORCHINDUCTOR_CACHE_DIR``,
``TRITON_CACHE_DIR`` and CUDA's ``CUDA_CACHE_PATH``, each a new temporary folder), so each seed pays the whole
``torch.compile`` cost as on a fresh machine. Without it, later seeds reuse what earlier ones compiled (Inductor's
default cache is in ``/tmp``), which a user's first run does not.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def first_time_below(evaluations: list[dict], target: float) -> float | None:
    return next((e["elapsed_s"] for e in evaluations if e["val_loss"] <= target), None)


COLD_CACHES = ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR", "CUDA_CACHE_PATH")


def cold_env(workdir: Path) -> dict[str, str]:
    """The environment with every compilation cache pointed at a new, empty folder under ``workdir``."""
    env = dict(os.environ)
    for name in COLD_CACHES:
        env[name] = tempfile.mkdtemp(prefix=name.lower() + "_", dir=workdir)
    return env


def run_seed(config: str, seed: int, extra: list[str], workdir: Path, cold: bool = False) -> dict:
    root = workdir / f"seed{seed}"
    cmd = [sys.executable, "-m", "mmgen", "fit", "--config", config, "--seed_everything", str(seed),
           "--data.init_args.seed", str(seed), "--trainer.default_root_dir", str(root), *extra]
    env = cold_env(workdir) if cold else None
    start = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"seed {seed} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    summary = json.loads(next(root.rglob("stopwatch.json")).read_text())
    summary.update(seed=seed, wall_s=round(time.time() - start, 2), cold=cold)
    print("\n".join(l for l in proc.stdout.splitlines() if l.startswith("[stopwatch]")), flush=True)
    return summary


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="recipes/text/shakespeare_char.yaml")
    p.add_argument("--seeds", type=int, nargs="+", default=[1337, 1338, 1339])
    p.add_argument("--targets", type=float, nargs="+", default=[1.50, 1.48])
    p.add_argument("--out", required=True)
    p.add_argument("--cold", action="store_true",
                   help="fresh, empty Inductor/Triton/CUDA compilation caches for every seed (a fresh machine's start)")
    p.add_argument("extra", nargs="*", help="further CLI overrides for mmgen fit (after --)")
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        runs = [run_seed(a.config, s, a.extra, Path(tmp), cold=a.cold) for s in a.seeds]
    for r in runs:
        r["time_to"] = {str(t): first_time_below(r["evaluations"], t) for t in a.targets}
    result = {
        "benchmark": "lm_train", "config": a.config, "overrides": a.extra, "seeds": a.seeds, "cold": a.cold,
        "host": platform.node(), "python": platform.python_version(),
        "device": _device(), "runs": runs,
        "mean_best_val_loss": _mean(r["best_val_loss"] for r in runs),
        "mean_train_tokens_per_s": _mean(r["train_tokens_per_s"] for r in runs),
        "time_to": {str(t): [r["time_to"][str(t)] for r in runs] for t in a.targets},
    }
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=2))
    print(json.dumps({k: v for k, v in result.items() if k != "runs"}, indent=2))


def _mean(values) -> float | None:
    """Mean of the values that were measured (a run shorter than the Stopwatch's warmup has no tokens/s)."""
    values = [v for v in values if v is not None]
    return statistics.mean(values) if values else None


def _device() -> str:
    import torch

    return torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu ({torch.get_num_threads()} threads)"


if __name__ == "__main__":
    main()
