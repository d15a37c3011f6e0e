"""Speech data: manifests and their errors, FSDD splits, connected digits, length-bucketed batches, bad items."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import lightning as L
import numpy as np
import soundfile as sf
import pytest
import torch

from mmgen.data import DataFileError, FSDDDataModule, ManifestDataModule, ManifestError, read_manifest
from mmgen.data.speech import DurationBatchSampler, fsdd_splits
from mmgen.modality import AudioFileError, VocabularyError
from mmgen.tasks import SpeechRecognizer
from mmgen_text import CharTokenizer

from tests.speech.conftest import TINY_ASR, audio, manifest, pick, tone, write_wav


def lines(path: Path, *rows: str) -> Path:
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    return path


@pytest.fixture
def clips(tmp_path: Path) -> list[Path]:
    return [write_wav(tmp_path / f"c{i}.wav", tone(0.3 + 0.1 * i, 8000, 200 + 50 * i), 8000) for i in range(4)]


def test_manifest_reads_relative_paths_and_speakers(tmp_path: Path, clips) -> None:
    m = lines(tmp_path / "m.jsonl", json.dumps({"audio": "c0.wav", "text": "hi", "speaker": "ann"}), "",
              json.dumps({"audio": str(clips[1]), "text": "there"}))
    items, problems = read_manifest(m)
    assert [(Path(u.audio[0]).name, u.text, u.speaker) for u in items] == [("c0.wav", "hi", "ann"),
                                                                            ("c1.wav", "there", None)]
    assert items[0].duration == pytest.approx(0.3) and items[1].where.endswith("m.jsonl:3") and problems == []


@pytest.mark.parametrize("row, expected", [
    ('{"audio": "c0.wav", "text": "hi"', "m.jsonl:2: malformed JSON"),
    ('{"audio": "c0.wav"}', "m.jsonl:2: expected an object with string fields"),
    ('["c0.wav", "hi"]', "m.jsonl:2: expected an object"),
    ('{"audio": "gone.wav", "text": "hi"}', "m.jsonl:2: audio file not found"),
])
def test_bad_manifest_line_gives_its_number(tmp_path: Path, clips, row: str, expected: str) -> None:
    m = lines(tmp_path / "m.jsonl", json.dumps({"audio": "c0.wav", "text": "ok"}), row)
    with pytest.raises((ManifestError, AudioFileError)) as err:
        read_manifest(m)
    assert expected in str(err.value) and "\n" not in str(err.value)
    items, problems = read_manifest(m, skip_bad=True)
    assert len(items) == 1 and len(problems) == 1 and expected in problems[0]


def test_missing_manifest(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match="manifest not found.*\"audio\": PATH"):
        read_manifest(tmp_path / "nope.jsonl")


def test_corrupt_audio_in_manifest_is_named_with_its_line(tmp_path: Path, clips) -> None:
    (tmp_path / "bad.wav").write_bytes(b"RIFF....WAVEnonsense")
    m = lines(tmp_path / "m.jsonl", json.dumps({"audio": "c0.wav", "text": "ok"}),
              json.dumps({"audio": "bad.wav", "text": "x"}))
    with pytest.raises(AudioFileError, match=r"m.jsonl:2: cannot read audio file .*bad.wav"):
        read_manifest(m)


def test_fsdd_standard_and_speaker_splits(fsdd_items) -> None:
    std = fsdd_splits(fsdd_items, "standard")
    assert {k: len(v) for k, v in std.items()} == {"train": 2000, "val": 250, "test": 250}
    assert {Path(u.audio[0]).stem.split("_")[2] for u in std["test"]} == {str(i) for i in range(5)}
    held = fsdd_splits(fsdd_items, "speaker", "lucas")
    assert {k: len(v) for k, v in held.items()} == {"train": 1800, "val": 200, "test": 500}
    assert {u.speaker for u in held["test"]} == {"lucas"}
    assert "lucas" not in {u.speaker for u in held["train"] + held["val"]}
    seen = [u.audio for part in held.values() for u in part]
    assert len(seen) == len(set(seen)) == 2500
    with pytest.raises(ValueError, match="accepted: george, jackson, lucas, nicolas, theo"):
        fsdd_splits(fsdd_items, "speaker", "alice")


def test_duration_batches_cover_everything_within_the_budget() -> None:
    rng = np.random.default_rng(0)
    durations = rng.uniform(0.2, 3.0, 200)
    sampler = DurationBatchSampler(durations, 10.0, shuffle=True, seed=1)
    batches = list(sampler)
    assert sorted(i for b in batches for i in b) == list(range(200))
    assert all(max(durations[b]) * len(b) <= 10.0 for b in batches)
    sampler.set_epoch(1)
    assert list(sampler) != batches  # a new order every epoch
    sampler.set_epoch(0)
    assert list(sampler) == batches  # and the same one for the same epoch
    ranks = [list(DurationBatchSampler(durations, 10.0, shuffle=True, seed=1, rank=r, world=2)) for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) and not {i for b in ranks[0] for i in b} & {i for b in ranks[1] for i in b}
    # Evaluation: every batch, however unevenly the ranks share them (the test split is read once, all of it).
    for world in (2, 3):
        ranks = [list(DurationBatchSampler(durations, 10.0, rank=r, world=world)) for r in range(world)]
        assert sorted(i for rank in ranks for b in rank for i in b) == list(range(200))
    with pytest.raises(ValueError, match="exceeds max_batch_seconds"):
        DurationBatchSampler([1.0, 12.0], 10.0)


def test_every_epoch_has_as_many_batches_as_the_first() -> None:
    """Lightning reads the loader's length once: every epoch must have that many batches, each utterance once, within
    the budget, though the jittered packing alone gives 41 to 43 batches depending on the epoch."""
    durations = np.random.default_rng(0).uniform(0.2, 3.0, 200)
    sampler = DurationBatchSampler(durations, 10.0, shuffle=True, seed=1)
    count = len(sampler)
    raw = set()
    for epoch in range(60):
        sampler.set_epoch(epoch)
        jitter = np.random.default_rng([1, epoch]).uniform(0.9, 1.1, 200)
        raw.add(len(sampler._pack(durations * jitter)))
        batches = list(sampler)
        assert len(batches) == len(sampler) == count
        assert sorted(i for b in batches for i in b) == list(range(200))
        assert all(max(durations[b]) * len(b) <= 10.0 for b in batches)
    assert min(raw) < count < max(raw)  # both repairs ran: a batch halved, the jitter narrowed


def test_keyed_batches_carry_the_epoch_and_resume_mid_epoch() -> None:
    durations = np.random.default_rng(0).uniform(0.2, 3.0, 50)
    sampler = DurationBatchSampler(durations, 10.0, shuffle=True, seed=1, keyed=True)
    sampler.set_epoch(3)
    batches = list(sampler)
    assert {e for b in batches for e, _ in b} == {3}
    sampler.resume(3, 2)  # a checkpoint two batches into epoch 3; Lightning then names that epoch 4
    sampler.set_epoch(4)
    sampler.begin_pass()
    assert list(sampler) == batches[2:] and len(sampler) == len(batches)
    sampler.set_epoch(5)  # the next epoch is ours 4, from its first batch
    sampler.begin_pass()
    assert sampler.epoch == 4 and {e for b in sampler for e, _ in b} == {4} and len(list(sampler)) == len(batches)


def test_transcript_outside_vocabulary(tmp_path: Path, clips) -> None:
    train = lines(tmp_path / "t.jsonl", *(json.dumps({"audio": f"c{i}.wav", "text": "abc"}) for i in range(3)))
    val = lines(tmp_path / "v.jsonl", json.dumps({"audio": "c3.wav", "text": "abz!"}))
    dm = ManifestDataModule(audio(), CharTokenizer(), train_manifest=str(train), val_manifest=str(val))
    dm.modalities  # noqa: B018
    with pytest.raises(VocabularyError, match=r"v.jsonl:1: transcript 'abz!'.*'!' 'z'"):
        dm.setup("fit")
    dm = ManifestDataModule(audio(), CharTokenizer(unknown="unk"), train_manifest=str(train), val_manifest=str(val))
    dm.setup("fit")  # mapped to <unk>, as configured
    dm = ManifestDataModule(audio(), CharTokenizer(), train_manifest=str(train), val_manifest=str(val), skip_bad=True)
    dm.modalities  # noqa: B018
    with pytest.warns(UserWarning, match="skipped 1 utterance"), pytest.raises(DataFileError, match="val split"):
        dm.setup("fit")  # the only validation utterance was skipped


def test_bad_audio_is_skipped_with_a_count(tmp_path: Path, clips) -> None:
    (tmp_path / "bad.wav").write_bytes(b"garbage")
    rows = [json.dumps({"audio": f"c{i}.wav", "text": "ab"}) for i in range(3)]
    train = lines(tmp_path / "t.jsonl", *rows, json.dumps({"audio": "bad.wav", "text": "ab"}))
    val = lines(tmp_path / "v.jsonl", rows[0])
    dm = ManifestDataModule(audio(), CharTokenizer(), train_manifest=str(train), val_manifest=str(val),
                            skip_bad=True)
    with pytest.warns(UserWarning, match=r"skipped 1 bad manifest line.*bad.wav"):
        dm.setup("fit")
    assert len(dm.problems) == 1 and len(dm._datasets["train"]) == 3


def test_clip_too_short_for_ctc_is_counted_and_still_trains(tmp_path: Path) -> None:
    write_wav(tmp_path / "long.wav", tone(1.0, 8000), 8000)
    write_wav(tmp_path / "short.wav", tone(0.1, 8000), 8000)  # 11 frames -> 3 tokens; the transcript needs 12
    train = lines(tmp_path / "t.jsonl", json.dumps({"audio": "long.wav", "text": "one two"}),
                  json.dumps({"audio": "short.wav", "text": "seven eleven"}))
    dm = ManifestDataModule(audio(), CharTokenizer(), train_manifest=str(train), val_manifest=str(train))
    with pytest.warns(UserWarning, match=r"train: 1 of 2 utterance\(s\) are too short .*short.wav|t.jsonl:2"):
        dm.setup("fit")
    assert [Path(w).name for w in dm.ctc_infeasible["train"]] == ["t.jsonl:2"]
    torch.manual_seed(0)
    model = SpeechRecognizer(dm.modalities, **TINY_ASR)
    batch = next(iter(dm.train_dataloader()))
    losses = model._losses(batch)
    assert torch.isfinite(losses["loss"]) and losses["ctc_infeasible"] == 1


def test_fsdd_data_module_batches_real_recordings(fsdd) -> None:
    dm = FSDDDataModule(audio(), CharTokenizer(), split="speaker", test_speaker="george", max_batch_seconds=6.0)
    assert dm.modalities["target"].chars == "efghinorstuvwxz"  # the letters of the digit words
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["source"].values.shape[-1] == 40 and len(batch["text"]) == batch["target"].values.shape[0]
    assert batch["source"].values.shape[1] * 0.01 * len(batch["text"]) <= 6.0 + 0.01 * len(batch["text"])
    assert "test" not in dm._datasets  # the test part is read only by `test`
    dm.setup("test")
    assert {u.speaker for u in dm._datasets["test"].items} == {"george"}


def test_missing_fsdd_folder_says_where(tmp_path: Path) -> None:
    dm = FSDDDataModule(audio(), CharTokenizer(), data_dir=str(tmp_path))
    with pytest.raises(DataFileError, match=r"fsdd/recordings"):
        dm.modalities  # noqa: B018


def test_fsdd_download_extracts_and_verifies(tmp_path: Path, monkeypatch) -> None:
    """The real download path, fed a local archive through a file:// URL: extracted, verified, renamed."""
    import io
    import tarfile

    from mmgen.data import paths

    src = tmp_path / "src"
    src.mkdir()
    for name in ("0_theo_0.wav", "1_george_3.wav", "2_yweweler_1.wav"):
        write_wav(src / name, tone(0.2, 8000), 8000)
    archive = tmp_path / "fsdd.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for f in src.iterdir():
            tar.add(f, arcname=f"free-spoken-digit-dataset-1.0.10/recordings/{f.name}")
        tar.add(src / "0_theo_0.wav", arcname="free-spoken-digit-dataset-1.0.10/README.wav")  # not extracted
    checked = [src / "0_theo_0.wav", src / "1_george_3.wav"]
    good = paths.Archive(archive.as_uri(), "free-spoken-digit-dataset-1.0.10/recordings/", "*_[gjlnt]*_*.wav",
                         paths.folder_digest(checked), 2)
    monkeypatch.setitem(paths.KNOWN_FOLDERS, "fsdd/recordings", good)
    folder = paths.resolve("fsdd/recordings", tmp_path / "data")
    assert sorted(f.name for f in folder.iterdir()) == ["0_theo_0.wav", "1_george_3.wav", "2_yweweler_1.wav"]
    bad = paths.Archive(good.url, good.member_prefix, good.verify_glob, "0" * 64, 2)
    monkeypatch.setitem(paths.KNOWN_FOLDERS, "fsdd/recordings", bad)
    with pytest.raises(DataFileError, match="expected 2 files with 000"):
        paths.resolve("fsdd/recordings", tmp_path / "other")
    assert not (tmp_path / "other" / "fsdd" / "recordings").exists()  # nothing half-done takes the name


def test_fsdd_speakers_option(fsdd) -> None:
    dm = FSDDDataModule(audio(), CharTokenizer(), speakers=["theo", "lucas"])
    assert {u.speaker for part in dm.splits().values() for u in part} == {"theo", "lucas"}
    with pytest.raises(ValueError, match="'alice'.*accepted: george"):
        FSDDDataModule(audio(), CharTokenizer(), speakers=["alice"]).splits()


def test_connected_digits_join_recordings_with_silence(fsdd) -> None:
    dm = FSDDDataModule(audio(), CharTokenizer(), connected=True, connected_counts=(60, 2, 2), gap_ms=100.0)
    dm.setup("fit")
    ds = dm._datasets["train"]
    u = ds.items[0]
    parts = [sf.read(p, dtype="float32")[0] for p in u.audio]
    wave = ds.waveform(0)
    assert len(wave) == sum(len(p) for p in parts) + 800 * (len(parts) - 1)  # 100 ms gaps at 8 kHz
    np.testing.assert_allclose(wave[:len(parts[0])].numpy(), parts[0], atol=1e-6)
    assert wave[len(parts[0]):len(parts[0]) + 800].abs().max() == 0
    assert ds.features(0).shape[0] == audio().num_frames(len(wave))
    assert u.duration == pytest.approx(len(wave) / 8000, abs=1e-3)


def test_speed_perturbation_changes_training_lengths_only(fsdd) -> None:
    dm = FSDDDataModule(audio(), CharTokenizer(), speakers=["theo"], speed_perturb=[0.9, 1.1])
    dm.setup("fit")
    train, val = dm._datasets["train"], dm._datasets["val"]
    plain = audio().num_frames(len(train.waveform(0)))
    lengths = {train.features(0).shape[0] for _ in range(12)}
    assert plain not in lengths and len(lengths) == 2  # 0.9x and 1.1x speed, drawn per fetch
    assert val.speeds is None and val.features(0).shape[0] == audio().num_frames(len(val.waveform(0)))
