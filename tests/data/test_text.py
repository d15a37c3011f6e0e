"""Text data: locating files (and the download path), reading corpora, and the seeded, shardable window stream."""

from __future__ import annotations

import io

import pytest
import torch
from torch.utils.data import DataLoader

from mmgen.data import DataFileError, RandomWindows, TextDataModule, data_dir, read_corpus, resolve
from mmgen.data import paths
from mmgen_text import CharTokenizer


def test_data_dir_follows_environment(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("MMGEN_DATA_DIR", str(tmp_path))
    assert data_dir() == tmp_path


def test_missing_known_file_fails_offline_with_url_and_place(monkeypatch, tmp_path) -> None:
    def offline(*args, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setattr(paths.urllib.request, "urlopen", offline)
    with pytest.raises(DataFileError) as err:
        resolve("tinyshakespeare/input.txt", tmp_path)
    msg = str(err.value)
    assert "raw.githubusercontent.com/karpathy/char-rnn" in msg and str(tmp_path / "tinyshakespeare") in msg


def test_download_is_checksum_verified_and_atomic(monkeypatch, tmp_path) -> None:
    monkeypatch.setattr(paths.urllib.request, "urlopen", lambda *a, **k: io.BytesIO(b"not shakespeare"))
    with pytest.raises(DataFileError, match="sha256"):
        resolve("tinyshakespeare/input.txt", tmp_path)
    assert not (tmp_path / "tinyshakespeare" / "input.txt").exists()
    good = b"real text\n"
    monkeypatch.setitem(paths.KNOWN_FILES, "x/y.txt", paths.Download("https://example.org/y.txt",
                                                                     __import__("hashlib").sha256(good).hexdigest()))
    monkeypatch.setattr(paths.urllib.request, "urlopen", lambda *a, **k: io.BytesIO(good))
    assert resolve("x/y.txt", tmp_path).read_bytes() == good


def test_unknown_missing_file_names_the_variable(tmp_path) -> None:
    with pytest.raises(DataFileError, match="MMGEN_DATA_DIR"):
        resolve("mine/corpus.txt", tmp_path)


def test_bad_corpora(tmp_path) -> None:
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(DataFileError, match="is empty"):
        read_corpus(empty)
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("caf\u00e9".encode("latin-1"))
    with pytest.raises(DataFileError, match=r"not UTF-8 text: byte 0xe9 at offset 3"):
        read_corpus(latin1)
    folder = tmp_path / "folder"
    folder.mkdir()
    with pytest.raises(DataFileError, match="no .txt files"):
        read_corpus(folder)
    (folder / "b.txt").write_text("second\n")
    (folder / "a.txt").write_text("first\n")
    (folder / "skip.md").write_text("not text data\n")
    assert read_corpus(folder) == "first\nsecond\n"


def test_windows_are_shifted_and_same_across_workers_and_resumable() -> None:
    ids = torch.arange(1000, dtype=torch.int16)
    ds = RandomWindows(ids, block_size=8, batch_size=4, num_batches=6, seed=1)
    batches = list(ds)
    x, y = batches[0]
    assert x.shape == (4, 8) and torch.equal(y, x + 1)  # consecutive ids: the target is the next token
    workers = list(DataLoader(ds, batch_size=None, num_workers=2))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(batches, workers))
    resumed = list(RandomWindows(ids, 8, 4, 6, seed=1, skip=4))
    assert len(resumed) == 2 and all(torch.equal(a[0], b[0]) for a, b in zip(batches[4:], resumed))
    other_rank = list(RandomWindows(ids, 8, 4, 6, seed=1, stream=1))
    assert not torch.equal(other_rank[0][0], batches[0][0])


def test_split_is_first_and_last_part(corpus) -> None:
    dm = TextDataModule(CharTokenizer(), path=str(corpus), block_size=8, batch_size=2)
    dm.setup("fit")
    text = corpus.read_text()
    n = int(len(text) * 0.9)
    tok = dm.modalities["text"]
    assert tok.decode(dm._train_ids.long()) == text[:n] and tok.decode(dm._val_ids.long()) == text[n:]
    with pytest.raises(ValueError, match="val_fraction"):
        TextDataModule(CharTokenizer(), path=str(corpus), val_fraction=1.5)


def test_validation_batches_have_their_own_size(corpus) -> None:
    dm = TextDataModule(CharTokenizer(), path=str(corpus), block_size=8, batch_size=2, val_batches=3,
                        val_batch_size=5)
    dm.setup("fit")
    val = list(dm.val_dataloader())
    assert [x.shape for x, _ in val] == [torch.Size([5, 8])] * 3
    assert all(torch.equal(a[0], b[0]) for a, b in zip(val, dm.val_dataloader()))  # a fixed set
    train_x, _ = next(iter(dm.train_dataloader()))
    assert train_x.shape == (2, 8)
    default = TextDataModule(CharTokenizer(), path=str(corpus), block_size=8, batch_size=2, val_batches=1)
    default.setup("fit")
    assert next(iter(default.val_dataloader()))[0].shape == (2, 8)
