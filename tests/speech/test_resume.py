"""Resuming a speech run from a checkpoint continues it bit for bit: the weights and the optimiser state after the
resumed run equal those of the same run trained straight through, with every source of randomness on (speed
perturbation, waveform augmentation, SpecAugment with frequency warp, dropout), loader workers or not, from a
checkpoint written mid-epoch, where ``max_steps`` ended mid-epoch, and where it ended with an epoch."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch

from mmgen.data import ManifestDataModule, WaveAugment
from mmgen.tasks import SpeechRecognizer
from mmgen_text import CharTokenizer
from tests.conftest import assert_same_weights_and_optimizer
from tests.speech.conftest import TINY_ASR, audio, manifest, pick

STEPS = 8  # 3 batches an epoch: the resumed part crosses at least one epoch boundary
AUGMENT = WaveAugment(noise_prob=0.5, reverb_prob=0.5, lowpass_prob=0.5, lowpass_hz=(1000.0, 3000.0),
                      gain_db=(-3.0, 3.0))


@pytest.fixture(scope="module", autouse=True)
def _single_threaded(one_thread) -> None:
    """Every run here on one thread, the straight run (a module fixture) included: a result is bit-exact for a
    given number of threads (see tests/conftest.py)."""


@pytest.fixture(scope="module")
def manifests(fsdd_items, tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("resume")
    return (manifest(root / "t.jsonl", pick(fsdd_items, ("theo",), range(10, 12), digits=range(4))),
            manifest(root / "v.jsonl", pick(fsdd_items, ("theo",), range(5, 6), digits=range(4))))


def train(root: Path, manifests: tuple[Path, Path], steps: int, *, workers: int = 0, ckpt_path: Path | None = None,
          every: int | None = None) -> L.Trainer:
    """A tiny recogniser with every random draw on; checkpoints ``root/last.ckpt`` and, with ``every``,
    ``root/every/step=N.ckpt``."""
    torch.manual_seed(0)
    dm = ManifestDataModule(audio(freq_warp=0.1), CharTokenizer(), train_manifest=str(manifests[0]),
                            val_manifest=str(manifests[1]), max_batch_seconds=1.0, num_workers=workers, seed=5,
                            speed_perturb=[0.9, 1.0, 1.1], augment=AUGMENT)
    model = SpeechRecognizer(dm.modalities, **{**TINY_ASR, "dropout": 0.1})
    callbacks = [L.pytorch.callbacks.ModelCheckpoint(dirpath=root, save_last=True)]
    if every:
        callbacks.append(L.pytorch.callbacks.ModelCheckpoint(dirpath=root / "every", every_n_train_steps=every,
                                                             save_top_k=-1, filename="{step}"))
    trainer = L.Trainer(accelerator="cpu", max_steps=steps, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, val_check_interval=None, check_val_every_n_epoch=10**6,
                        num_sanity_val_steps=0, gradient_clip_val=1.0, callbacks=callbacks, default_root_dir=root)
    trainer.fit(model, datamodule=dm, ckpt_path=ckpt_path)
    return trainer


def assert_same_state(straight: L.Trainer, resumed: L.Trainer) -> None:
    assert resumed.global_step == straight.global_step == STEPS
    assert_same_weights_and_optimizer(straight, resumed)
    assert straight.lr_scheduler_configs[0].scheduler.state_dict() == \
        resumed.lr_scheduler_configs[0].scheduler.state_dict()


@pytest.fixture(scope="module")
def straight(manifests, tmp_path_factory) -> tuple[L.Trainer, Path]:
    root = tmp_path_factory.mktemp("straight")
    return train(root, manifests, STEPS, every=4), root


def test_the_setup_resumes_mid_epoch_and_crosses_epochs(straight) -> None:
    trainer, root = straight
    assert trainer.num_training_batches == 3
    ckpt = torch.load(root / "every" / "step=4.ckpt", weights_only=True)  # nothing pickled
    assert ckpt["loops"]["fit_loop"]["state_dict"]["combined_loader"] == [{"epoch": 1, "batches": 1}]
    assert "rng" in ckpt["ManifestDataModule"]


def test_resume_from_a_mid_epoch_checkpoint_is_exact(straight, manifests, tmp_path) -> None:
    trainer, root = straight
    resumed = train(tmp_path, manifests, STEPS, ckpt_path=root / "every" / "step=4.ckpt")
    assert_same_state(trainer, resumed)
    assert resumed.current_epoch == trainer.current_epoch


@pytest.mark.parametrize("stop", [4, 3], ids=["max_steps_mid_epoch", "max_steps_at_epoch_end"])
def test_stop_at_max_steps_then_resume_is_exact(stop, straight, manifests, tmp_path) -> None:
    """``last.ckpt`` is written when training ends, after Lightning has counted the cut epoch as completed: the
    resumed run's own epoch counter reads one more (Lightning's bookkeeping), but the data continue in the right
    epoch, at the right batch."""
    train(tmp_path / "a", manifests, stop)
    resumed = train(tmp_path / "b", manifests, STEPS, ckpt_path=tmp_path / "a" / "last.ckpt")
    assert_same_state(straight[0], resumed)


@pytest.fixture(scope="module")
def straight_with_workers(manifests, tmp_path_factory) -> L.Trainer:
    return train(tmp_path_factory.mktemp("workers"), manifests, STEPS, workers=2)


@pytest.mark.parametrize("stop", [4, 3], ids=["mid_epoch", "at_epoch_end"])
def test_resume_with_loader_workers_is_exact(stop, straight_with_workers, manifests, tmp_path) -> None:
    train(tmp_path / "a", manifests, stop, workers=2)
    resumed = train(tmp_path / "b", manifests, STEPS, workers=2, ckpt_path=tmp_path / "a" / "last.ckpt")
    assert_same_state(straight_with_workers, resumed)
