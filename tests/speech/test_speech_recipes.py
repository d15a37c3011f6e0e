"""Every speech recipe parses through the CLI and trains for two steps (only batch size and lengths overridden),
then tests once; the manifest recipe runs on a small sentence-level manifest built here from real recordings."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

import mmgen
from mmgen.config import cli_main

from tests.speech.conftest import pick

ROOT = Path(__file__).resolve().parents[2]
RECIPES = sorted((ROOT / "recipes" / "speech").glob("*.yaml"))
SMALL = ["--trainer.max_steps", "2", "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1",
         "--trainer.limit_test_batches", "1", "--trainer.val_check_interval", "2", "--trainer.check_val_every_n_epoch",
         "null", "--data.max_batch_seconds",
         "6", "--data.num_workers", "0", "--model.d_model", "32", "--model.encoder_layers", "1",
         "--model.decoder_layers", "1", "--data.source.conv_channels", "8"]


@pytest.fixture(scope="module")
def sentences(fsdd_items, tmp_path_factory) -> Path:
    """A sentence-level manifest folder: 16 kHz stereo WAVs of three digits each, with a speaker field."""
    root = tmp_path_factory.mktemp("sentences")
    clips = pick(fsdd_items, ("jackson", "nicolas"), range(10, 11))  # one of each digit and speaker, by digit
    rng = np.random.default_rng(0)
    for split, count in (("train", 12), ("val", 3), ("test", 3)):
        with (root / f"{split}.jsonl").open("w") as f:
            for n in range(count):
                digits = [(3 * n + i) % 10 for i in range(3)] if split == "train" else rng.integers(10, size=3)
                parts = [clips[2 * d + n % 2] for d in digits]  # every digit appears in training
                wave = np.concatenate([np.pad(sf.read(p.audio[0], dtype="float32")[0], (0, 800)) for p in parts])
                wave = np.repeat(wave, 2)  # 8 kHz -> 16 kHz by sample doubling: a file at another rate
                path = root / "clips" / f"{split}{n}.wav"
                path.parent.mkdir(exist_ok=True)
                sf.write(path, np.stack([wave, wave], axis=1), 16000)
                f.write(json.dumps({"audio": f"clips/{path.name}", "text": " ".join(p.text for p in parts),
                                    "speaker": parts[0].speaker}) + "\n")
    return root


def test_speech_recipes_exist() -> None:
    assert {p.name for p in RECIPES} >= {"fsdd_ctc_attention.yaml", "manifest_ctc_attention.yaml"}


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_speech_recipe_trains_two_steps_then_tests(recipe: Path, sentences: Path, tmp_path: Path, capsys) -> None:
    first = recipe.read_text().splitlines()[:6]
    assert any(f"mmgen fit --config {recipe.relative_to(ROOT)}" in line for line in first), "command on top"
    extra = []
    if "manifest" in recipe.name:
        extra = ["--data.data_dir", str(sentences), "--data.train_manifest", "train.jsonl", "--data.val_manifest",
                 "val.jsonl", "--data.test_manifest", "test.jsonl", "--data.max_batch_seconds", "12"]
    cli = cli_main(["fit", "--config", str(recipe), *SMALL, *extra, "--trainer.default_root_dir", str(tmp_path)])
    assert cli.trainer.global_step == 2
    assert "[val_transcripts @ step 2]" in capsys.readouterr().out  # transcripts with their errors at validation
    assert any(tmp_path.rglob("val_attention/step_000002.png"))  # an attention map, as an image
    last = next(tmp_path.rglob("last.ckpt"))
    cli_main(["test", "--config", str(recipe), *SMALL, *extra, "--trainer.default_root_dir", str(tmp_path),
              "--ckpt_path", str(last)])
    out = capsys.readouterr().out
    assert "test_wer" in out and "[test_transcripts @ step" in out
    model = mmgen.load(last)
    assert type(model).__name__ == "SpeechRecognizer" and model.source.spec.sample_rate in (8000, 16000)
