"""The Stopwatch callback's summary (milestones, validation timings) and the training benchmark's cold-cache option."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import lightning as L
import torch

from mmgen.callbacks import Stopwatch
from mmgen.data import TextDataModule
from mmgen_text import CharTokenizer
from tests.conftest import tiny_model

ROOT = Path(__file__).resolve().parents[1]


def test_stopwatch_records_milestones_and_validation_times(corpus: Path, tmp_path: Path, capsys) -> None:
    torch.manual_seed(0)
    dm = TextDataModule(CharTokenizer(), path=str(corpus), batch_size=4, val_batches=2, seed=7)
    model = tiny_model(dm.modalities["text"], sample_tokens=4)
    watch = Stopwatch(warmup_steps=2, json_path=str(tmp_path / "stopwatch.json"))
    trainer = L.Trainer(accelerator="cpu", max_steps=6, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False, val_check_interval=3,
                        check_val_every_n_epoch=None, num_sanity_val_steps=0, callbacks=[watch])
    trainer.fit(model, datamodule=dm)
    summary = json.loads((tmp_path / "stopwatch.json").read_text())
    m = summary["milestones"]
    assert set(m) == {"fit_start", "step_1", "step_2"} and 0 < m["fit_start"] <= m["step_1"] <= m["step_2"]
    assert [e["step"] for e in summary["evaluations"]] == [3, 6]
    for e in summary["evaluations"]:
        assert 0 <= e["sample_s"] <= e["val_s"]
    assert summary["train_tokens_per_s"] > 0
    out = capsys.readouterr().out
    assert "[stopwatch] fit start" in out and "validation took" in out


def _lm_train():
    spec = importlib.util.spec_from_file_location("lm_train", ROOT / "benchmarks" / "lm_train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cold_env_gives_fresh_empty_caches(tmp_path: Path) -> None:
    lm_train = _lm_train()
    first, second = lm_train.cold_env(tmp_path), lm_train.cold_env(tmp_path)
    for name in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR", "CUDA_CACHE_PATH"):
        assert first[name] != second[name]
        for env in (first, second):
            path = Path(env[name])
            assert path.is_dir() and path.parent == tmp_path and not any(path.iterdir())
    assert first["PATH"] == os.environ["PATH"]  # the rest of the environment is kept
    assert lm_train._mean([1.0, None, 3.0]) == 2.0 and lm_train._mean([None]) is None
