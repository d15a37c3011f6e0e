"""Checkpoints: JSON plugin state under "mmgen", weights_only loading, mmgen.load, fine-tuning and resuming."""

from __future__ import annotations

import json

import lightning as L
import pytest
import torch

import mmgen
from mmgen.checkpoint import CheckpointError
from mmgen.data import TextDataModule
from mmgen.modality import VocabularyError
from mmgen.tasks import LanguageModel
from mmgen_text import CharTokenizer
from tests.conftest import VERSE, assert_same_weights_and_optimizer, fit, tiny_model


@pytest.fixture
def trained(tmp_path, corpus):
    fit(tmp_path / "run", corpus, 3)
    return tmp_path / "run" / "last.ckpt"


def test_checkpoint_is_weights_only_with_json_plugin_record(trained) -> None:
    ckpt = torch.load(trained, weights_only=True)
    record = ckpt["mmgen"]
    assert record["format"] == 1 and record["task"] == "mmgen.tasks.language_model.LanguageModel"
    text = record["modalities"]["text"]
    assert (text["name"], text["plugin"], text["distribution"]) == ("CharTokenizer", "text", "mmgen")
    assert text["version"] == mmgen.__version__
    assert text["state"]["chars"] == "".join(sorted(set(VERSE)))
    json.dumps(record)  # plain JSON, nothing pickled


def test_load_round_trip_is_bit_exact(trained) -> None:
    model = mmgen.load(trained)
    saved = torch.load(trained, weights_only=True)["state_dict"]
    assert saved.keys() == model.state_dict().keys()
    assert all(torch.equal(saved[k], v) for k, v in model.state_dict().items())
    assert not model.training
    assert len(model.generate("Thou", 10, seed=0)) == 10


def test_missing_plugin_names_the_package(trained, tmp_path) -> None:
    ckpt = torch.load(trained, weights_only=True)
    ckpt["mmgen"]["modalities"]["text"].update(name="GoneTokenizer", plugin="gone", distribution="mmgen-gone")
    torch.save(ckpt, tmp_path / "gone.ckpt")
    with pytest.raises(CheckpointError, match="install package 'mmgen-gone'"):
        mmgen.load(tmp_path / "gone.ckpt")


def test_not_a_checkpoint(tmp_path) -> None:
    with pytest.raises(CheckpointError, match="not found"):
        mmgen.load(tmp_path / "nope.ckpt")
    torch.save({"state_dict": {}}, tmp_path / "plain.ckpt")
    with pytest.raises(CheckpointError, match="not an mmgen checkpoint"):
        mmgen.load(tmp_path / "plain.ckpt")


def test_init_from_takes_weights_and_vocabulary_with_a_fresh_optimizer(trained, tmp_path) -> None:
    subset = tmp_path / "subset.txt"
    subset.write_text("Thou art more lovely\n" * 30)  # fewer characters than the checkpoint's vocabulary
    trainer, model, dm = fit(tmp_path / "ft", subset, 0, init_from=str(trained))
    source = mmgen.load(trained)
    assert model.text.state_dict() == source.text.state_dict()  # the checkpoint's vocabulary, not the subset's
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), source.state_dict().values()))
    trainer, model, dm = fit(tmp_path / "ft2", subset, 2, init_from=str(trained))
    assert trainer.global_step == 2  # counted from zero: a new run, not a resume


def test_init_from_with_unseen_characters(trained, tmp_path) -> None:
    other = tmp_path / "other.txt"
    other.write_text("Zounds! Quoth Xerxes, 42 times.\n" * 20)
    with pytest.raises(VocabularyError) as err:
        fit(tmp_path / "ft", other, 1, init_from=str(trained))
    msg = str(err.value)
    assert "'Z'" in msg and "'X'" in msg and "'4'" in msg and "unknown: unk" in msg
    assert f"{len(set(other.read_text()))} distinct characters" in msg and "vocabulary (" in msg
    trainer, model, dm = fit(tmp_path / "ft_unk", other, 1, init_from=str(trained), unknown="unk")
    assert trainer.global_step == 1


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_resume_continues_exactly(dropout, tmp_path, corpus, one_thread) -> None:
    """The resumed run ends with the weights and optimiser state of the run trained straight through, dropout on or
    off: the data module's checkpoint state holds the global random state the dropout draws from, and the loaders
    draw their base seeds from generators of their own."""
    trainer_a, straight, _ = fit(tmp_path / "a", corpus, 4, dropout=dropout)
    fit(tmp_path / "b", corpus, 2, dropout=dropout)
    ckpt = torch.load(tmp_path / "b" / "last.ckpt", weights_only=True)  # nothing pickled
    state = ckpt["TextDataModule"]
    assert state["train_batches_consumed"] == 2 and state["seed"] == 7 and "rng" in state
    trainer, resumed, _ = fit(tmp_path / "b2", corpus, 4, ckpt_path=str(tmp_path / "b" / "last.ckpt"),
                              dropout=dropout)
    assert trainer.global_step == trainer_a.global_step == 4
    assert straight.state_dict().keys() == resumed.state_dict().keys()
    assert_same_weights_and_optimizer(trainer_a, trainer)


def test_resume_from_a_checkpoint_without_random_state(tmp_path, corpus, one_thread) -> None:
    """A checkpoint written before the data module saved the random state (no "rng" key) still resumes, at the
    right window."""
    fit(tmp_path / "a", corpus, 2)
    ckpt = torch.load(tmp_path / "a" / "last.ckpt", weights_only=True)
    del ckpt["TextDataModule"]["rng"]
    torch.save(ckpt, tmp_path / "old.ckpt")
    trainer, _, dm = fit(tmp_path / "b", corpus, 4, ckpt_path=str(tmp_path / "old.ckpt"))
    assert trainer.global_step == 4 and dm._resume_step == 2


def test_resume_with_different_vocabulary_is_refused(tmp_path, corpus) -> None:
    fit(tmp_path / "a", corpus, 2)
    other = tmp_path / "other.txt"
    other.write_text(VERSE.upper() * 20)
    with pytest.raises(CheckpointError, match="init_from"):
        fit(tmp_path / "b", other, 4, ckpt_path=str(tmp_path / "a" / "last.ckpt"))


def test_init_from_with_another_architecture(trained, tmp_path, corpus) -> None:
    with pytest.raises(CheckpointError, match="do not fit"):
        fit(tmp_path / "x", corpus, 1, init_from=str(trained), d_model=64)


@pytest.mark.parametrize("stage", ["validate", "test"])
def test_evaluating_with_different_vocabulary_says_cannot_evaluate(stage, tmp_path, corpus) -> None:
    trainer, _, _ = fit(tmp_path / "a", corpus, 2)
    other = tmp_path / "other.txt"
    other.write_text(VERSE.upper() * 20)
    dm = TextDataModule(CharTokenizer(), path=str(other), batch_size=4, val_batches=2, seed=7)
    model = tiny_model(dm.modalities["text"])
    evaluate = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    with pytest.raises(CheckpointError) as err:
        getattr(evaluate, stage)(model, datamodule=dm, ckpt_path=str(tmp_path / "a" / "last.ckpt"), verbose=False)
    saved, built = len(set(VERSE)), len(set(VERSE.upper()))
    assert str(err.value) == (
        f"cannot evaluate the checkpoint on this data: the checkpoint's vocabulary differs from the one built from "
        f"this data ({saved} vs {built} characters); to {stage} it on other text load its weights and vocabulary "
        f"with `--model.init_from CKPT` instead of `--ckpt_path`")


def test_a_save_killed_mid_write_leaves_the_previous_checkpoint_whole(tmp_path, corpus, monkeypatch) -> None:
    """Checkpoints are written through Lightning's atomic save (a temporary file renamed on success): a write that
    dies half-way leaves the last good checkpoint byte for byte, and no partial file under its name."""
    import fsspec.implementations.local as local

    trainer, model, _ = fit(tmp_path, corpus, 2)
    last = tmp_path / "last.ckpt"
    before = last.read_bytes()
    files = sorted(tmp_path.rglob("*"))
    real_write = local.LocalFileOpener.write

    def dying_write(self, data):
        real_write(self, data[: len(data) // 2])
        raise KeyboardInterrupt("killed during the checkpoint write")

    monkeypatch.setattr(local.LocalFileOpener, "write", dying_write)
    with pytest.raises(KeyboardInterrupt):
        trainer.save_checkpoint(last)
    monkeypatch.undo()
    assert last.read_bytes() == before
    assert sorted(tmp_path.rglob("*")) == files  # no partial or temporary file left behind
    torch.load(last, weights_only=True)  # still a whole checkpoint
