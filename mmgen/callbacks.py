"""Callbacks for measuring runs: wall-clock time from process start to each validation, and training throughput."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import lightning as L
import torch

__all__ = ["Stopwatch", "process_start_time"]

_IMPORT_TIME = time.time()


def process_start_time() -> float:
    """Unix time at which this process started (Linux ``/proc``; else the time mmgen was first imported)."""
    try:
        ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        boot = next(int(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                    if line.startswith("btime"))
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, StopIteration, ValueError, IndexError):
        return _IMPORT_TIME


class Stopwatch(L.Callback):
    """Print and log, at every validation, the seconds since the process started; measure training tokens/s.

    Throughput is training tokens over the wall time of training segments (validation excluded, and the first
    ``warmup_steps`` left out for compilation). The device is synchronised only where a segment starts or ends, so
    measuring does not stall the GPU. Milestones of the start (fit start: imports, data and model built; step 1 done:
    first compilation; step ``warmup_steps`` done) and each validation's duration (with the text sample's share) show
    where the time before the first evaluation goes. A summary is written as JSON at the end of fit: to
    ``json_path``, or ``stopwatch.json`` in the logger's directory.

    Args:
        warmup_steps: training steps left out of the throughput measurement.
        json_path: where to write the summary; default the logger's directory.
    """

    def __init__(self, warmup_steps: int = 50, json_path: str | None = None) -> None:
        self.warmup_steps = warmup_steps
        self.json_path = json_path
        self.start = process_start_time()
        self.evaluations: list[dict] = []
        self._tokens = 0
        self._train_time = 0.0
        self._segment: float | None = None
        self.milestones: dict[str, float] = {}
        self._val_start: float | None = None
        self._val_epoch_end: float | None = None

    def _mark(self, trainer: L.Trainer, name: str, text: str) -> None:
        self.milestones[name] = round(time.time() - self.start, 2)
        if trainer.is_global_zero:
            print(f"[stopwatch] {text} at {self.milestones[name]:.1f} s since process start", flush=True)

    @staticmethod
    def _sync(trainer: L.Trainer) -> None:
        if trainer.strategy.root_device.type == "cuda":
            torch.cuda.synchronize()

    def _close(self, trainer: L.Trainer) -> None:
        if self._segment is not None:
            self._sync(trainer)
            self._train_time += time.perf_counter() - self._segment
            self._segment = None

    def on_fit_start(self, trainer, pl_module) -> None:
        self._mark(trainer, "fit_start", "fit start (imports, data, model built)")

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self._segment is None and trainer.global_step >= self.warmup_steps:
            self._sync(trainer)
            self._segment = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step in (1, self.warmup_steps) and f"step_{trainer.global_step}" not in self.milestones:
            self._mark(trainer, f"step_{trainer.global_step}", f"step {trainer.global_step} done")
        if self._segment is not None:
            self._tokens += _count_tokens(batch) * trainer.world_size

    def on_validation_start(self, trainer, pl_module) -> None:
        self._close(trainer)
        self._val_start = time.perf_counter()

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        # Runs before the task's own hook, which generates the text sample.
        self._sync(trainer)
        self._val_epoch_end = time.perf_counter()

    def on_train_end(self, trainer, pl_module) -> None:
        self._close(trainer)

    @property
    def tokens_per_second(self) -> float | None:
        return self._tokens / self._train_time if self._train_time else None

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking or "val_loss" not in trainer.callback_metrics:
            return
        row = {"step": trainer.global_step, "val_loss": float(trainer.callback_metrics["val_loss"]),
               "elapsed_s": round(time.time() - self.start, 2)}
        row.update({k: float(v) for k, v in trainer.callback_metrics.items()
                    if k.startswith("val_") and k != "val_loss" and v.numel() == 1})  # val_wer, val_cer...
        now = time.perf_counter()
        if self._val_start is not None:
            row["val_s"] = round(now - self._val_start, 3)  # the whole validation, text sample included
        if self._val_epoch_end is not None:
            row["sample_s"] = round(now - self._val_epoch_end, 3)  # the text sample (and epoch-end logging)
        self.evaluations.append(row)
        if trainer.is_global_zero:
            tps = self.tokens_per_second
            extra = f", train {tps:,.0f} tokens/s" if tps else ""
            if "val_s" in row:
                extra += f", validation took {row['val_s']:.2f} s (sample {row.get('sample_s', 0.0):.2f} s)"
            others = "".join(f", {k} {v:.4f}" for k, v in row.items() if k.startswith("val_") and k not in
                             ("val_loss", "val_s"))
            print(f"[stopwatch] step {row['step']}: val_loss {row['val_loss']:.4f}{others} at {row['elapsed_s']:.1f} s "
                  f"since process start{extra}", flush=True)

    def summary(self) -> dict:
        best = min((e["val_loss"] for e in self.evaluations), default=None)
        return {"evaluations": self.evaluations, "best_val_loss": best, "train_tokens_per_s": self.tokens_per_second,
                "milestones": self.milestones, "total_s": round(time.time() - self.start, 2)}

    def on_fit_end(self, trainer, pl_module) -> None:
        path = self.json_path or (Path(trainer.log_dir) / "stopwatch.json" if trainer.log_dir else None)
        if path and trainer.is_global_zero:
            path = Path(path)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(self.summary(), indent=2))


def _count_tokens(batch) -> int:
    """Tokens in a training batch: a language model's (x, y) windows, or the real source frames of a speech batch."""
    if isinstance(batch, (tuple, list)):
        return batch[0].numel()
    if isinstance(batch, dict) and hasattr(batch.get("source"), "mask"):
        return int(batch["source"].mask.sum())
    return 0
