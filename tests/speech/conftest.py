"""Speech fixtures: real FSDD recordings (through the data directory), small manifests, synthetic sound files."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import numpy as np
import pytest
import soundfile as sf
import torch

from mmgen.data import data_dir
from mmgen.data.speech import Utterance, fsdd_utterances, write_manifest
from mmgen.tasks import SpeechRecognizer
from mmgen_audio import LogMelFrames
from mmgen_text import CharTokenizer

TINY_ASR = dict(d_model=32, num_heads=2, encoder_layers=2, decoder_layers=1, dropout=0.0, warmup_steps=5,
                lr_decay_steps=200, log_transcripts=2, beam_size=3)


@pytest.fixture(scope="session")
def fsdd() -> Path:
    path = data_dir() / "fsdd" / "recordings"
    assert path.is_dir(), f"FSDD recordings not found at {path}: set MMGEN_DATA_DIR"
    return path


@pytest.fixture(scope="session")
def fsdd_items(fsdd: Path) -> list[Utterance]:
    return fsdd_utterances(fsdd)


def pick(items: list[Utterance], speakers: tuple[str, ...], indices: range, digits=range(10)) -> list[Utterance]:
    """FSDD utterances of the given speakers, recording indices and digits."""
    words = {("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")[d] for d in digits}
    return [u for u in items if u.speaker in speakers and u.text in words
            and int(Path(u.audio[0]).stem.split("_")[2]) in indices]


def manifest(path: Path, items: list[Utterance]) -> Path:
    write_manifest(path, items)
    return path


def write_wav(path: Path, wave: np.ndarray, rate: int, **kwargs) -> Path:
    sf.write(path, wave, rate, **kwargs)
    return path


def tone(seconds: float, rate: int, freq: float = 440.0, seed: int = 0) -> np.ndarray:
    t = np.arange(round(seconds * rate)) / rate
    noise = np.random.default_rng(seed).normal(0, 0.01, t.shape)
    return (0.3 * np.sin(2 * np.pi * freq * t) + noise).astype(np.float32)


def audio(**overrides) -> LogMelFrames:
    return LogMelFrames(**{**dict(sample_rate=8000, n_mels=40, conv_channels=16), **overrides})


def fit_asr(root: Path, train: Path, val: Path, steps: int, *, ckpt_path: str | None = None, seed: int = 0,
            audio_args: dict | None = None, **model_args) -> tuple[L.Trainer, SpeechRecognizer]:
    """Train a tiny recogniser on manifests; the last checkpoint is ``root/last.ckpt``."""
    from mmgen.data import ManifestDataModule

    torch.manual_seed(seed)
    dm = ManifestDataModule(audio(**(audio_args or {})), CharTokenizer(), train_manifest=str(train), val_manifest=str(val),
                            max_batch_seconds=8.0)
    model = SpeechRecognizer(dm.modalities, **{**TINY_ASR, **model_args})
    trainer = L.Trainer(accelerator="cpu", max_steps=steps, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, val_check_interval=None, check_val_every_n_epoch=10**6,
                        num_sanity_val_steps=0, gradient_clip_val=1.0,
                        callbacks=[L.pytorch.callbacks.ModelCheckpoint(dirpath=root, save_last=True)],
                        default_root_dir=root)
    trainer.fit(model, datamodule=dm, ckpt_path=ckpt_path)
    return trainer, model
