"""Distributed data parallel training and evaluation of the recipes, on this machine's CPU: two processes (gloo),
launched the way a user launches them, ``mmgen fit --trainer.devices 2 --trainer.strategy ddp``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mmgen.data import data_dir

ROOT = Path(__file__).resolve().parents[1]
# Lightning's DDP launcher starts the other rank by running this script again with the same arguments; rank 0
# writes the run's metrics.
DRIVER = """
import json, sys
from mmgen.config import cli_main
out, args = sys.argv[1], sys.argv[2:]
cli = cli_main(args)
if cli.trainer.is_global_zero:
    metrics = {k: float(v) for k, v in cli.trainer.callback_metrics.items()}
    json.dump({**metrics, "step": cli.trainer.global_step, "world": cli.trainer.world_size}, open(out, "w"))
"""
SMALL = ["--config", str(ROOT / "recipes" / "speech" / "fsdd_ctc_attention.yaml"), "--trainer.accelerator", "cpu",
         "--trainer.val_check_interval", "3", "--trainer.check_val_every_n_epoch", "null",
         "--trainer.limit_val_batches", "2", "--trainer.enable_progress_bar", "false", "--data.max_batch_seconds", "6",
         "--data.num_workers", "0", "--model.d_model", "32", "--model.encoder_layers", "1", "--model.decoder_layers",
         "1", "--data.source.conv_channels", "8", "--data.split", "speaker", "--data.test_speaker", "theo"]


def launch(tmp_path: Path, out: Path, command: str, *args: str, devices: int = 2,
           recipe: list[str] = SMALL) -> subprocess.CompletedProcess:
    """``mmgen COMMAND`` with the small recipe, then ``args`` (after the recipe, so they override it)."""
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    strategy = ["--trainer.devices", str(devices)] + (["--trainer.strategy", "ddp"] if devices > 1 else [])
    env = {**os.environ, "MMGEN_DATA_DIR": str(data_dir().resolve()), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(driver), str(out), command, *recipe, *strategy, *args], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=600)


def run(tmp_path: Path, name: str, command: str, *args: str, **kwargs) -> dict:
    """:func:`launch`, which must succeed; rank 0's metrics."""
    out = tmp_path / f"{name}.json"
    proc = launch(tmp_path, out, command, *args, **kwargs)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text())


def latest(root: str) -> Path:
    return max(Path(root).rglob("last.ckpt"), key=lambda p: p.stat().st_mtime)


@pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                    reason="this torch build has no gloo backend")
def test_two_process_training_resumes_and_tests_every_utterance_once(tmp_path: Path) -> None:
    root = str(tmp_path / "run")
    fit = run(tmp_path, "fit", "fit", "--trainer.max_steps", "6", "--trainer.default_root_dir", root)
    assert fit["world"] == 2 and fit["step"] == 6 and "val_wer" in fit
    last = latest(root)
    assert torch.load(last, map_location="cpu", weights_only=False)["global_step"] == 6  # written by rank 0

    resumed = run(tmp_path, "resume", "fit", "--trainer.max_steps", "9", "--trainer.default_root_dir", root,
                  "--ckpt_path", str(last))
    assert resumed["step"] == 9
    assert torch.load(latest(root), map_location="cpu", weights_only=False)["global_step"] == 9

    # The test split read by two ranks (uneven halves, every batch) scores as one process does: the error counts
    # are summed over ranks (torchmetrics), not averaged over batches.
    last = latest(root)
    test = ["--trainer.default_root_dir", root, "--ckpt_path", str(last), "--model.decoding", "ctc_greedy"]
    two, one = run(tmp_path, "test2", "test", *test), run(tmp_path, "test1", "test", *test, devices=1)
    assert two["world"] == 2 and one["world"] == 1
    assert two["test_wer"] == pytest.approx(one["test_wer"], abs=1e-6)
    assert two["test_cer"] == pytest.approx(one["test_cer"], abs=1e-6)


def test_a_distributed_sampler_is_refused_with_the_flag_that_fixes_it(tmp_path: Path) -> None:
    proc = launch(tmp_path, tmp_path / "x.json", "fit", "--trainer.use_distributed_sampler", "true",
                  "--trainer.max_steps", "1", "--trainer.default_root_dir", str(tmp_path))
    assert proc.returncode != 0
    assert "use_distributed_sampler=False" in proc.stderr and "--trainer.use_distributed_sampler false" in proc.stderr


def test_two_process_language_model_training(tmp_path: Path) -> None:
    """The text data module needs no distributed sampler either: each rank draws its own stream of windows."""
    recipe = ["--config", str(ROOT / "recipes" / "text" / "shakespeare_char_cpu.yaml"), "--trainer.accelerator",
              "cpu", "--trainer.val_check_interval", "3"]
    root = str(tmp_path / "lm")
    fit = run(tmp_path, "lm", "fit", "--trainer.max_steps", "3", "--trainer.default_root_dir", root, recipe=recipe)
    assert fit["world"] == 2 and fit["step"] == 3 and "val_loss" in fit
    assert torch.load(latest(root), map_location="cpu", weights_only=False)["global_step"] == 3

